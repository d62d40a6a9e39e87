#!/usr/bin/env node
// node ohif_sr_check.mjs SR.dcm IMAGE.dcm [IMAGE.dcm ...]
//
// Opens an SR the way OHIF 3.13 does and prints one JSON object on stdout:
//   ohif: what OHIF's SR SOP class handler makes of it. getDisplaySetsFromSeries
//     (through OHIF's DisplaySetService), then load() with the images' display
//     sets active, exactly as the SR viewport calls it. `drawn` lists the
//     DICOMSRDisplay annotations load() put in Cornerstone's annotation store:
//     what the SR viewport renders, with the text lines its tool draws.
//   cornerstone3d: Cornerstone3D adapters' MeasurementReport.generateToolState
//     on the same SR, called as OHIF's hydrateStructuredReport calls it, with
//     every given image's imageId (OHIF itself passes the imageIds of the
//     measurements load() placed, so this still runs when load() failed).
// The exit status is 0 whenever the JSON was produced; the caller judges it.
import {
  captureConsole,
  createApp,
  csAdapters,
  csCore,
  csTools,
  imageDisplaySet,
  loadOhif,
  readDicomFiles,
  storeInstances,
} from './ohif_env.mjs';

const warnings = captureConsole();

function errorJson(error) {
  process.stderr.write(`${error?.stack ?? error}\n`);
  return { name: error?.name ?? 'Error', message: String(error?.message ?? error) };
}

function imagePoint(imageId, world) {
  const [x, y] = csCore.utilities.worldToImageCoords(imageId, world);
  return [Number(x.toFixed(3)), Number(y.toFixed(3))];
}

function drawnAnnotations(app, srDisplaySet) {
  const active = new Set(app.services.displaySetService.getActiveDisplaySets().map(ds => ds.displaySetInstanceUID));
  const SRDisplay = csTools.state.tools.DICOMSRDisplay?.toolClass;
  return csTools.annotation.state
    .getAllAnnotations()
    .filter(a => a.metadata?.toolName === 'DICOMSRDisplay')
    .map(a => {
      const imageId = a.metadata.referencedImageId;
      const uids = imageId ? app.metadataProvider.getUIDsFromImageID(imageId) : undefined;
      const points = a.data.handles?.points ?? [];
      return {
        trackingUniqueIdentifier: a.data.TrackingUniqueIdentifier,
        label: a.data.label ?? null,
        labels: a.data.labels ?? [],
        // The lines DICOMSRDisplayTool.renderTextBox draws next to the region.
        textLines: SRDisplay ? SRDisplay.prototype._getTextBoxLinesFromLabels(a.data.labels ?? []) : null,
        graphicType: a.metadata.graphicType,
        valueType: a.metadata.valueType,
        referencedSOPInstanceUID: uids?.SOPInstanceUID ?? null,
        onActiveDisplaySet: active.has(a.metadata.displaySetInstanceUID),
        fromThisSR: srDisplaySet.measurements?.some(m => m.TrackingUniqueIdentifier === a.data.TrackingUniqueIdentifier) ?? false,
        pointCount: points.length,
        imagePoints: imageId ? points.map(p => imagePoint(imageId, p)) : [],
      };
    });
}

function measurementSummary(m) {
  return {
    trackingIdentifier: m.TrackingIdentifier ?? null,
    trackingUniqueIdentifier: m.TrackingUniqueIdentifier ?? null,
    coordCount: m.coords?.length ?? 0,
    graphicType: m.coords?.[0]?.GraphicType ?? null,
    referencedSOPInstanceUID: m.coords?.[0]?.ReferencedSOPSequence?.ReferencedSOPInstanceUID ?? null,
    loaded: m.loaded === true,
    labels: m.labels ?? [],
  };
}

async function runOhif(app, ohifCore, sr, images) {
  const { displaySetService } = app.services;
  for (const series of storeInstances(ohifCore, images)) {
    displaySetService.addDisplaySets(imageDisplaySet(ohifCore, series));
  }
  storeInstances(ohifCore, [sr]);
  const seriesInstances = ohifCore.DicomMetadataStore.getSeries(sr.StudyInstanceUID, sr.SeriesInstanceUID).instances;
  const made = displaySetService.makeDisplaySets(seriesInstances, { madeInClient: true }) ?? [];
  const result = {
    displaySets: made.map(ds => ({ handler: ds.SOPClassHandlerId, isImagingMeasurementReport: ds.isImagingMeasurementReport })),
    loadThrew: false,
    loadError: null,
    measurementCount: null,
    measurements: [],
    isRehydratable: null,
    drawn: [],
  };
  const srDisplaySet = made[0];
  if (!srDisplaySet) {
    result.loadError = { name: 'NoDisplaySet', message: 'the SR SOP class handler made no display set' };
    return result;
  }
  try {
    await srDisplaySet.load();
  } catch (error) {
    result.loadThrew = true;
    result.loadError = errorJson(error);
  }
  const measurements = srDisplaySet.measurements ?? [];
  result.measurementCount = measurements.length;
  result.measurements = measurements.map(measurementSummary);
  result.isRehydratable = srDisplaySet.isRehydratable ?? null;
  result.drawn = drawnAnnotations(app, srDisplaySet);
  return result;
}

function runCornerstone3D(ohifCore, sr, images) {
  const { MeasurementReport } = csAdapters.adaptersSR.Cornerstone3D;
  const srInstance = ohifCore.DicomMetadataStore.getInstance(sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID);
  const sopInstanceUIDToImageId = {};
  for (const image of images) {
    sopInstanceUIDToImageId[`${image.SOPInstanceUID}:1`] = image.url;
  }
  const result = { threw: false, error: null, toolStates: [] };
  let byToolType = {};
  try {
    byToolType = MeasurementReport.generateToolState(srInstance, sopInstanceUIDToImageId, csCore.metaData);
  } catch (error) {
    result.threw = true;
    result.error = errorJson(error);
  }
  for (const [toolType, states] of Object.entries(byToolType)) {
    for (const state of states) {
      const data = state.annotation?.data ?? {};
      const polyline = data.contour?.polyline;
      result.toolStates.push({
        toolType,
        label: data.label ?? null,
        description: state.description ?? null,
        trackingUniqueIdentifier: state.TrackingUniqueIdentifier ?? null,
        referencedSOPInstanceUID: state.sopInstanceUid ?? null,
        pointCount: (polyline ?? data.handles?.points ?? []).length,
        closed: data.contour?.closed ?? null,
      });
    }
  }
  return result;
}

async function main() {
  const [srPath, ...imagePaths] = process.argv.slice(2);
  if (!srPath || imagePaths.length === 0) {
    process.stderr.write('usage: node ohif_sr_check.mjs SR.dcm IMAGE.dcm [IMAGE.dcm ...]\n');
    process.exit(2);
  }
  const { ohifCore, srExtension } = loadOhif();
  const app = createApp(ohifCore, srExtension);
  const [sr, ...images] = readDicomFiles([srPath, ...imagePaths]);
  const ohif = await runOhif(app, ohifCore, sr, images);
  const cornerstone3d = runCornerstone3D(ohifCore, sr, images);
  process.stdout.write(`${JSON.stringify({ ohif, cornerstone3d, warnings }, null, 1)}\n`);
}

main().catch(error => {
  process.stderr.write(`${error?.stack ?? error}\n`);
  process.exit(1);
});
